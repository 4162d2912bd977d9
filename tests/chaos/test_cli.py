"""``resilient-chaos check`` and ``suite`` on bad input: every file is checked and every error reported; a
missing or empty scenario directory, or a selection with nothing to run, is exit 2 with a message that says
what to pass, and nothing is written. No scenario runs here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resilient.chaos import cli, suite
from resilient.chaos.scenario import ScenarioError


@pytest.fixture(autouse=True)
def _keep_pytest_signal_handlers(monkeypatch) -> None:
    monkeypatch.setattr(cli, "_interruptible", lambda: None)  # main() turns SIGINT/SIGTERM into SystemExit


def _scenario(name: str, tier: str = "ci", step: int = 3, **extra) -> dict:
    return {"name": name, "tier": tier, "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]},
            "faults": [{"id": "k", "trigger": {"step": step}, "action": "kill_worker", "target": {"host": "h1"}}],
            **extra}


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_check_reports_every_bad_file_not_only_the_first(tmp_path: Path, capsys) -> None:
    good = _write(tmp_path / "good.yaml", _scenario("good"))
    typo = _write(tmp_path / "typo.yaml", _scenario("typo", expect={"reactions": ["worker.exitt"]}))
    late = _write(tmp_path / "late.yaml", _scenario("late", step=40))
    assert cli.main(["check", str(typo), str(good), str(late)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok (good, tier ci, 1 fault(s))" in out
    assert f"{typo}.expect: expect.reactions[0]='worker.exitt'" in err and "Did you mean 'worker.exit'?" in err
    assert f"{late}.faults[0]: trigger step=40 can never fire" in err
    assert "2 of 3 input(s) failed the check" in err
    assert cli.main(["check", str(good)]) == 0


def test_check_of_a_directory_checks_its_yaml_files(tmp_path: Path, capsys) -> None:
    d = tmp_path / "scenarios"
    _write(d / "a.yaml", _scenario("a"))
    _write(d / "b.yaml", _scenario("b", tier="full"))
    (d / "notes.txt").write_text("not a scenario")
    assert cli.main(["check", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"{d / 'a.yaml'}: ok" in out and f"{d / 'b.yaml'}: ok" in out and "notes" not in out
    (tmp_path / "empty").mkdir()
    assert cli.main(["check", str(tmp_path / "empty")]) == 2
    assert "holds no *.yaml file" in capsys.readouterr().err


def test_run_of_a_directory_points_to_check_and_suite(tmp_path: Path, capsys) -> None:
    assert cli.main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a scenario file" in err and "resilient-chaos suite" in err


@pytest.mark.parametrize("setup, needle", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no *.yaml file"),
    (lambda d: _write(d, _scenario("x")), "is a file, not a directory"),
    (lambda d: _write(d / "a.yaml", _scenario("a", tier="full")), "holds no scenario of tier ci"),
    (lambda d: (_write(d / "a.yaml", _scenario("same")), _write(d / "b.yaml", _scenario("same"))),
     "both name their scenario 'same'"),
    (lambda d: _write(d / "bad.yaml", _scenario("bad", step=99)), "trigger step=99 can never fire"),
])
def test_a_suite_with_nothing_valid_to_run_is_exit_2_and_writes_nothing(tmp_path: Path, capsys, setup,
                                                                        needle: str) -> None:
    d, out = tmp_path / "scenarios", tmp_path / "results"
    setup(d)
    assert cli.main(["suite", str(d), "--tier", "ci", "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_only_names_outside_the_tier_are_refused_with_the_way_out(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", _scenario("a"))
    _write(tmp_path / "b.yaml", _scenario("b", tier="full"))
    assert [s.name for s in suite.select(tmp_path, "ci", ["a"])] == ["a"]
    assert [s.name for s in suite.select(tmp_path, "full", ["b"])] == ["b"]
    with pytest.raises(ScenarioError, match=r"--only b: no such scenario in tier ci .*\(b is tier full: add "
                                            r"--tier full\); the tier's scenarios are \['a'\]"):
        suite.select(tmp_path, "ci", ["b"])
    with pytest.raises(ScenarioError, match="--only nope: no such scenario"):
        suite.select(tmp_path, "full", ["nope"])
