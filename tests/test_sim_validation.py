"""The simulator against published deployments (profiles/published/), the README's table, and the sources of every
number the catalog and the simulation profiles use."""

import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from hetrun.profile import device_catalog
from hetrun.sim.validation import cases, markdown_table, run_case

ROOT = Path(__file__).resolve().parents[1]
CASES = cases()
FOLLOWABLE = ("http://", "https://", "assumption", "tests/", "profiles/", "hetrun/")


@pytest.fixture(scope="module")
def rows():
    return {c.name: run_case(c) for c in CASES}


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_published_case_is_simulated_within_its_band(rows, case):
    r = rows[case]
    assert r["feasible"] and r["simulated"] is not None
    assert abs(r["error_pct"]) <= r["tolerance_pct"], f"{case}: {r['error_pct']:+.1f}%"


def test_four_organisations_within_20_percent_one_of_them_on_ascend(rows):
    inside = [r for r in rows.values() if abs(r["error_pct"]) <= 20.0]
    orgs = {r["organisation"].split(" (")[0].split(" and ")[0].split(" / ")[0] for r in inside}
    assert len(orgs) >= 4, orgs
    ascend = {c.name for c in CASES if "ascend" in yaml.safe_load(
        resources.files("hetrun.profiles.published").joinpath(c.name.split("/")[1] + ".yaml").read_text())
        ["devices"][0]["type"]}
    assert any(r["case"] in ascend for r in inside)
    day6 = {r["case"]: r for r in rows.values() if "deepseek-day6" in r["case"]}
    assert set(day6) == {"published/deepseek-day6-prefill", "published/deepseek-day6-decode"}
    assert {r["published"] for r in day6.values()} == {73700.0, 14800.0}


def test_a_wider_band_always_says_why(rows):
    for c in CASES:
        if c.tolerance_pct > 20.0:
            assert len(str(c.published.get("miss", ""))) > 80, c.name
        assert c.published["source"].startswith("https://") and len(c.published["setup"]) > 100
        assert "fitted" in c.published and len(str(c.published["fitted"])) > 40


def test_readme_table_is_the_simulators(rows):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Simulator validation", 1)[1]
    table = markdown_table([rows[c.name] for c in CASES])
    assert table in section, "README's validation table is stale: print it with `hetrun bench simulate published`"


def _sources(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _sources(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _sources(v)
    elif isinstance(obj, str):
        yield obj


def test_every_catalog_and_simulation_source_can_be_followed_or_says_assumption():
    for name, dt in device_catalog().items():
        assert dt.sources, name
        for s in dt.sources:
            assert "DESIGN.md" not in s and any(t in s for t in FOLLOWABLE), f"{name}: {s}"
    files = sorted((ROOT / "profiles").glob("*.yaml")) + sorted((ROOT / "profiles" / "published").glob("*.yaml"))
    for f in files:
        sim = (yaml.safe_load(f.read_text()).get("extra") or {}).get("sim") or {}
        for s in _sources(sim.get("sources", {})):
            assert "DESIGN.md" not in s and any(t in s for t in FOLLOWABLE), f"{f.name}: {s}"
    price = next(s for s in device_catalog()["h100-sxm"].sources if s.startswith("price"))
    assert price.startswith("price: assumption")  # DeepSeek's $2 is per H800 hour, not a source for the H100


def test_ascend_910c_is_752_tflops_per_package_and_half_per_die():
    cat = device_catalog()
    assert cat["ascend-910c"].tflops["bf16"] == 752 and cat["ascend-910c"].memory_gb == 128
    die = cat["ascend-910c-die"]
    assert die.tflops["bf16"] == 376 and die.memory_gb == 64 and die.memory_bw_gbs == 1600
    for t in ("h200", "b200", "gb200"):
        assert t in cat
    assert cat["b200"].peak_flops("nvfp4") == 2 * cat["b200"].peak_flops("fp8")
    assert re.search(r"arxiv\.org/abs/2506\.12708", " ".join(cat["ascend-910c"].sources))
