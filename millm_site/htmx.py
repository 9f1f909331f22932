"""Shared htmx answers for the pages' actions."""

from django.shortcuts import render

from millm_site.errors import MillmError


def error_fragment(request, exc: MillmError):
    """Show a refused action in the page's #action-error box instead of swapping the target."""
    response = render(request, "partials/error.html", {"message": f"{exc.code}: {exc.message}"})
    response["HX-Retarget"] = "#action-error"
    response["HX-Reswap"] = "outerHTML"
    return response
