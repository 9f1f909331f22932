from django.core.management.base import BaseCommand

from downloads.management.commands._downloading import request_or_fail, run_with_bar
from downloads.services import model_download_request


class Command(BaseCommand):
    help = "Download a model from the HuggingFace hub into MODEL_CACHE_DIR and register it (runs here, no worker)."

    def add_arguments(self, parser):
        parser.add_argument("repo_id", help="hub repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
        parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
        parser.add_argument("--quantization", default="none", choices=["none", "q8", "q4"])
        parser.add_argument("--name", help="catalog name (default: the repo's name)")
        parser.add_argument("--trust-remote-code", action="store_true", help="allow a repo that ships its own code")
        parser.add_argument("--token", help="hub token for this download only (default: HF_TOKEN); never stored")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def handle(self, *args, repo_id, revision, quantization, name, trust_remote_code, token, quiet, **options):
        download = request_or_fail(lambda: model_download_request(
            repo_id=repo_id, revision=revision, quantization=quantization, name=name,
            trust_remote_code=trust_remote_code))
        done = run_with_bar(download, token=token, quiet=quiet)
        model = done.catalog_model
        self.stdout.write(self.style.SUCCESS(
            f"Model {model.name} ready: {model.parameter_count or 0:,} parameters, hidden {model.hidden_size}, "
            f"{model.num_layers} layers, in {model.local_path}"))
