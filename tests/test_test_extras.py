"""The test extras (pyproject's `test`) are imported through conftest.import_test_dependency: one that is not
installed skips its tests, saying so; one that is installed but cannot be imported fails the run. With
pytest.importorskip a broken install skipped too: torchvision's CUDA wheel next to a CPU torch broke
`import peft` (through transformers), and all 22 PEFT cross-checks skipped as "pip install peft"."""

from __future__ import annotations

import pytest

from conftest import import_test_dependency


def fake_distribution(root, name: str, body: str) -> None:
    """An installed distribution `name` (its dist-info metadata) whose module `name` runs `body` on import."""
    (root / f"{name}.py").write_text(body)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")


def test_installed_but_unimportable_fails_loudly(tmp_path, monkeypatch):
    # What transformers raised for peft: a ModuleNotFoundError (an ImportError, which importorskip skips on).
    fake_distribution(tmp_path, "brokenextra", 'raise ModuleNotFoundError("Could not import module \'Bloom\'")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    # Skip and fail are both exceptions to pytest: catch either, so a skip cannot pass for this test's own skip.
    with pytest.raises(BaseException) as outcome:
        import_test_dependency("brokenextra", "brokenextra", "a reference implementation")
    assert outcome.type is pytest.fail.Exception, f"{outcome.type.__name__}: {outcome.value}"
    assert str(outcome.value) == ("brokenextra 1.0 is installed but `import brokenextra` fails: "
                                  "ModuleNotFoundError: Could not import module 'Bloom'")


def test_not_installed_skips_saying_how_to_install(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=r"a reference \(no-such-extra is not installed: pip install -e .\[test\]\)"):
        import_test_dependency("no_such_extra", "no-such-extra", "a reference")


def test_installed_and_importable_is_returned(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "fineextra", "VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_test_dependency("fineextra", "fineextra", "a reference").VALUE == 42
