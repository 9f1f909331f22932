"""The History page's filter form: GET parameters in, HistoryFilters out."""

from __future__ import annotations

from django import forms

from monitoring.history_selectors import HistoryFilters
from monitoring.models import RequestStatus


class HistoryFilterForm(forms.Form):
    model = forms.CharField(required=False, max_length=100)
    profile = forms.CharField(required=False, max_length=100)
    status = forms.ChoiceField(required=False, choices=[("", "any"), *RequestStatus.choices])
    endpoint = forms.CharField(required=False, max_length=32)
    since = forms.DateTimeField(required=False)  # no zone given (datetime-local inputs) = TIME_ZONE, UTC
    until = forms.DateTimeField(required=False)
    q = forms.CharField(required=False, max_length=200)
    page = forms.IntegerField(required=False, min_value=1)

    def filters(self) -> HistoryFilters:
        """The valid filters; an invalid field is left out (and shown as an error) rather than failing the page."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        return HistoryFilters(model=data.get("model") or "", profile=data.get("profile") or "",
                              status=data.get("status") or "", endpoint=data.get("endpoint") or "",
                              since=data.get("since"), until=data.get("until"), q=(data.get("q") or "").strip())

    def page_number(self) -> int:
        self.is_valid()
        return getattr(self, "cleaned_data", {}).get("page") or 1
