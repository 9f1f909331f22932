import time

from django.core.management.base import BaseCommand

from catalog.demo import demo_assets_ensure


class Command(BaseCommand):
    help = "Build the demo assets (model + SAE + labels) and register them in the catalog."

    def add_arguments(self, parser):
        parser.add_argument("--tier", choices=["test", "demo", "all"], default="demo")
        parser.add_argument("--force", action="store_true", help="rebuild even if cached on disk")

    def handle(self, *args, tier: str, force: bool, **options):
        for one_tier in (["test", "demo"] if tier == "all" else [tier]):
            started = time.monotonic()
            model, sae = demo_assets_ensure(tier=one_tier, force=force)
            self.stdout.write(
                f"{one_tier} tier: model {model.name} ({model.parameter_count:,} params) and SAE {sae.name} "
                f"(layer {sae.layer}, {sae.d_sae} features, {sae.labels.count()} labels) "
                f"registered in {time.monotonic() - started:.1f}s"
            )
