from django.core.management.base import BaseCommand, CommandError

from downloads.management.commands._downloading import request_or_fail, run_with_bar
from downloads.services import sae_download_request


class Command(BaseCommand):
    help = ("Download an SAE (hub repo + folder, or a SAELens release + sae id) into SAE_CACHE_DIR and register it "
            "for a catalog model (runs here, no worker).")

    def add_arguments(self, parser):
        parser.add_argument("repo_id", nargs="?", default="", help="hub repo id (with --path)")
        parser.add_argument("--path", default="", help="folder inside the repo that holds cfg.json")
        parser.add_argument("--release", default="", help="SAELens release, e.g. gpt2-small-res-jb (with --sae-id)")
        parser.add_argument("--sae-id", default="", help="SAE id inside the release")
        parser.add_argument("--model", required=True, help="catalog name of the model the SAE reads")
        parser.add_argument("--revision", default="main")
        parser.add_argument("--name", help="catalog name (default: <model>-<folder>)")
        parser.add_argument("--token", help="hub token for this download only (default: HF_TOKEN); never stored")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def handle(self, *args, repo_id, path, release, sae_id, model, revision, name, token, quiet, **options):
        if not repo_id and not release:
            raise CommandError("give a repo id (and --path) or --release with --sae-id")
        download = request_or_fail(lambda: sae_download_request(
            model=model, repo_id=repo_id, path=path, release=release, sae_id=sae_id, revision=revision, name=name))
        done = run_with_bar(download, token=token, quiet=quiet)
        sae = done.catalog_sae
        self.stdout.write(self.style.SUCCESS(
            f"SAE {sae.name} ready for {sae.model.name}: layer {sae.layer} ({sae.hook_name}), d_sae {sae.d_sae}, "
            f"{sae.architecture}, in {sae.local_path}"))
