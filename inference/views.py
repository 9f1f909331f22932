from django.shortcuts import render

from inference.selectors import model_list


def models_page(request):
    return render(request, "inference/models.html", {"models": model_list(), "nav": "models"})
