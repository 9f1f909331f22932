import asyncio

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.management.base import BaseCommand

from inference.process import InferenceWorker


class Command(BaseCommand):
    help = "Run the dedicated inference process (holds the model; reached over the channel layer)."

    def handle(self, *args, **options):
        worker = InferenceWorker(channel_layer=get_channel_layer(), channel_name=settings.INFERENCE_CHANNEL,
                                 pinned_model=settings.INFERENCE_MODEL or None)
        asyncio.run(worker.run())
