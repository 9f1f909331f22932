from django.db.models import Count
from django.shortcuts import render

from profiles.models import Profile


def profiles_page(request):
    profiles = Profile.objects.select_related("model", "sae").annotate(feature_count=Count("features"))
    return render(request, "profiles/profiles.html", {"profiles": profiles, "nav": "profiles"})
