from django.shortcuts import render

from steering.selectors import feature_search, sae_list


def saes_page(request):
    return render(request, "steering/saes.html", {"saes": sae_list(), "nav": "saes"})


def steering_page(request):
    """The feature browser; an htmx search request gets only the results fragment."""
    saes = list(sae_list())
    chosen = next((s for s in saes if str(s.pk) == request.GET.get("sae")), saes[0] if saes else None)
    query = request.GET.get("q", "")
    features = feature_search(sae=chosen, query=query) if chosen else []
    context = {"saes": saes, "sae": chosen, "q": query, "features": features, "nav": "steering"}
    template = "steering/_feature_rows.html" if request.htmx else "steering/steering.html"
    return render(request, template, context)
