from django.apps import AppConfig


class MillmSiteConfig(AppConfig):
    name = "millm_site"
    verbose_name = "miLLM site"

    def ready(self) -> None:
        from millm_site import checks  # noqa: F401 - registers the deploy checks
