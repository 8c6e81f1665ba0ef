"""The open-hold index covers the expiry sweep's whole order, (expiry, id): on the partitioned table each
partition's scan then stops at the batch's size, instead of every expired hold being read and sorted for
each batch. The new index is built before the old one is dropped."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0013_allocate_quota_by_agent"),
        ("ledger", "0016_grant_agent"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="allocation",
            index=models.Index(
                condition=models.Q(("status", "held")),
                fields=["expires_at", "id"],
                name="allocation_open_hold_order_idx",
            ),
        ),
        migrations.RemoveIndex(model_name="allocation", name="allocation_open_hold_idx"),
    ]
