"""The login page for MILLM_API_KEY: the key once, then a session flag (see millm_site/middleware.py)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponseRedirect
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from millm_site.middleware import LOGIN_PATH, SESSION_KEY, key_digest, key_matches


def _safe_next(request, raw: str) -> str:
    allowed = url_has_allowed_host_and_scheme(raw, allowed_hosts={request.get_host()}, require_https=request.is_secure())
    return raw if raw and raw.startswith("/") and allowed else "/"


@require_http_methods(["GET", "POST"])
def login_page(request):
    next_url = _safe_next(request, request.POST.get("next") or request.GET.get("next", "/"))
    if not settings.MILLM_API_KEY:
        return HttpResponseRedirect(next_url)
    if request.method == "POST":
        if key_matches(request.POST.get("key", "")):
            request.session.cycle_key()  # a new session id on login: no fixation
            request.session[SESSION_KEY] = key_digest()
            return HttpResponseRedirect(next_url)
        return render(request, "login.html", {"next": next_url, "error": "Wrong key."}, status=403)
    return render(request, "login.html", {"next": next_url})


@require_POST
def logout_action(request):
    request.session.flush()
    return HttpResponseRedirect(LOGIN_PATH)
