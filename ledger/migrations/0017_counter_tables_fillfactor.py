from django.db import migrations

# The tables whose rows every allocation updates in place: an agent's quota rows (used, reserved,
# spent_usd) and its budgets (spent_usd, reserved_usd). None of those columns is indexed, so an update can
# be HOT (heap-only: the new row version on the same page, no entry added to any of the table's indexes)
# whenever the page has room for it. At the default fill factor of 100 a page is filled up on insert and
# the first update of each row moves it to another page and inserts into every index (five on quotas).
# Pages filled to 80 % keep room for the updates between two prunings of the page. Only pages written
# from now on are affected; pg_repack applies it to an existing table (docs/operations.md).
COUNTER_TABLES = ("quotas", "ledger_budget")
FILLFACTOR = 80


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0016_grant_agent"),
    ]

    operations = [
        migrations.RunSQL(
            # SHARE UPDATE EXCLUSIVE: readers and writers of the table go on meanwhile.
            sql=[f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})" for table in COUNTER_TABLES],
            reverse_sql=[f"ALTER TABLE {table} RESET (fillfactor)" for table in COUNTER_TABLES],
        ),
    ]
