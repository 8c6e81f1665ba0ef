"""Loading optimization rules from YAML with the management command."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from ledger.models import OptimizationRule
from ledger.reference import SEED_RULES_YAML
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def rule_file(tmp_path):
    def write(text: str):
        path = tmp_path / "rules.yml"
        path.write_text(text)
        return str(path)

    return write


def test_loads_the_product_description_example(db, rule_file, capsys):
    call_command("load_rules", rule_file(SEED_RULES_YAML))
    rules = {rule.name: rule for rule in OptimizationRule.objects.all()}
    assert set(rules) == {"HighResourceUtilization", "BudgetExceeded"}
    budget = rules["BudgetExceeded"]
    assert budget.condition == "budget_utilization_percent > 90"
    assert (budget.duration_seconds, budget.severity, budget.action) == (60, "critical", "throttle")
    assert "Loaded 2 rule(s)" in capsys.readouterr().out


def test_loading_again_updates_instead_of_duplicating(reference_data, rule_file):
    call_command("load_rules", rule_file(SEED_RULES_YAML.replace("> 80", ">= 75")))
    assert OptimizationRule.objects.count() == 2
    rule = OptimizationRule.objects.get(name="HighResourceUtilization")
    assert (rule.operator, rule.threshold) == (">=", Decimal("75"))


def test_scoped_rule_with_cooldown(reference_data, rule_file):
    agent = AgentFactory(id="agent-7")
    call_command(
        "load_rules",
        rule_file(
            "alerts:\n  - name: Spiky\n    condition: cost_spike_ratio >= 3.5\n    duration: 2h\n"
            "    cooldown: 30m\n    scope: agent\n    agent: agent-7\n"
            "    action: recommend\n    severity: info\n"
        ),
    )
    rule = OptimizationRule.objects.get(name="Spiky")
    assert (rule.agent, rule.threshold, rule.duration_seconds, rule.cooldown_seconds) == (
        agent,
        Decimal("3.5"),
        7200,
        1800,
    )


BAD_FILES = {
    "not-yaml": "alerts: [name: x\n  - : :",
    "no-alerts-list": "rules:\n  - name: A\n",
    "unknown-metric": "alerts:\n  - name: A\n    condition: happiness_percent > 3\n",
    "bad-condition": "alerts:\n  - name: A\n    condition: resource_utilization_percent is big\n",
    "bad-duration": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n    duration: soon\n",
    "bad-severity": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n    severity: loud\n",
    "bad-action": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n    action: explode\n",
    "unknown-key": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n    colour: red\n",
    "duplicate-name": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n"
    "  - name: A\n    condition: error_rate_percent > 6\n",
    "unknown-agent": "alerts:\n  - name: A\n    condition: error_rate_percent > 5\n    scope: agent\n"
    "    agent: nobody\n",
}


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_are_refused_and_load_nothing(db, rule_file, text):
    # A good rule first in the file: it must not be loaded either.
    good = "alerts:\n  - name: Good\n    condition: error_rate_percent > 1\n"
    body = good + text.split("alerts:\n", 1)[1] if text.startswith("alerts:\n") else text
    with pytest.raises(CommandError) as excinfo:
        call_command("load_rules", rule_file(body))
    assert "nothing was loaded" in str(excinfo.value)
    assert not OptimizationRule.objects.exists()


def test_missing_file_is_a_clear_error(db):
    with pytest.raises(CommandError, match="cannot read"):
        call_command("load_rules", "/nonexistent/rules.yml")
