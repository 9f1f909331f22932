from django.core.management.base import BaseCommand

from catalog.selectors import model_list
from downloads.selectors import download_list
from steering.selectors import sae_list


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Command(BaseCommand):
    help = "List the catalog: models, SAEs and recent downloads."

    def add_arguments(self, parser):
        parser.add_argument("--downloads", type=int, default=20, help="how many recent downloads to show")

    def handle(self, *args, downloads: int, **options):
        self.stdout.write(self.style.MIGRATE_HEADING("Models"))
        for m in model_list():
            self.stdout.write(f"  {m.name:32} {m.status:12} {m.repo_id}@{m.revision}  params={m.parameter_count or '?'} "
                              f"hidden={m.hidden_size} layers={m.num_layers} quant={m.quantization}  {m.local_path}")
        self.stdout.write(self.style.MIGRATE_HEADING("SAEs"))
        for s in sae_list():
            self.stdout.write(f"  {s.name:32} {s.status:12} model={s.model.name} layer={s.layer} d_sae={s.d_sae} "
                              f"{s.architecture}  {s.local_path}")
        self.stdout.write(self.style.MIGRATE_HEADING("Downloads"))
        for d in download_list(limit=downloads):
            source = f"{d.release}/{d.sae_id}" if d.release else f"{d.repo_id}{'/' + d.path if d.path else ''}"
            error = f"  {d.error_code}: {d.error_message}" if d.error_code else ""
            self.stdout.write(f"  #{d.pk:<5} {d.kind:5} {d.name:32} {d.status:10} {_size(d.bytes_done)}/"
                              f"{_size(d.bytes_total)}  {source}@{d.revision}{error}")
