"""Several SAEs stay attached across a restart: `desired_attached` is no longer unique, and
`attached_order` keeps the order they were attached in (the first is the default SAE)."""

from django.db import migrations, models


def order_desired(apps, schema_editor):
    SparseAutoencoder = apps.get_model("steering", "SparseAutoencoder")
    SparseAutoencoder.objects.filter(desired_attached=True).update(attached_order=0)


class Migration(migrations.Migration):
    dependencies = [("steering", "0004_sweep_run")]

    operations = [
        migrations.RemoveConstraint(model_name="sparseautoencoder", name="sae_single_desired_attached"),
        migrations.AddField(model_name="sparseautoencoder", name="attached_order",
                            field=models.PositiveIntegerField(blank=True, null=True)),
        migrations.RunPython(order_desired, migrations.RunPython.noop),
    ]
