from django.core.management.base import BaseCommand

from catalog.local_files import model_delete
from downloads.management.commands._downloading import request_or_fail


class Command(BaseCommand):
    help = "Delete a model from the catalog with its SAEs and their downloaded files (files under the download roots)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="catalog name of the model")

    def handle(self, *args, name, **options):
        result = request_or_fail(lambda: model_delete(name=name))
        folders = ", ".join(result["removed_folders"]) or "none (outside the download folders, or shared)"
        saes = ", ".join(result["deleted_saes"]) or "none"
        self.stdout.write(self.style.SUCCESS(f"Deleted {name} (SAEs: {saes}); removed folders: {folders}"))
