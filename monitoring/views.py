from django.shortcuts import render

from inference.selectors import model_list
from monitoring.models import RequestRecord
from steering.selectors import sae_list


def home_page(request):
    context = {"models": model_list(), "saes": sae_list(), "nav": "home"}
    return render(request, "monitoring/home.html", context)


def monitor_page(request):
    recent = RequestRecord.objects.all()[:20]
    return render(request, "monitoring/monitor.html", {"recent": recent, "nav": "monitor"})
