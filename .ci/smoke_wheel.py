"""Smoke test of the installed wheel, as a user gets it.

Run with the python of a venv that has the built wheel installed (not editable), from a folder
outside the checkout: ``cd "$(mktemp -d)" && /path/to/venv/bin/python -I /path/to/smoke_wheel.py``.
Prints ``wheel smoke ok <version>`` and exits 0, or exits non-zero with the reason.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def check(ok: object, what: str) -> None:
    if not ok:
        raise SystemExit(f"wheel smoke FAILED: {what}")


def check_installed(module: object, name: str) -> Path:
    """The package comes from site-packages, not the checkout, and ships its py.typed."""
    path = Path(getattr(module, "__file__", None) or "").resolve()
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(path.is_relative_to(purelib), f"{name} imported from {path}, not from {purelib}")
    check(not path.is_relative_to(CHECKOUT), f"{name} imported from the checkout: {path}")
    check((path.parent / "py.typed").is_file(), f"{name} has no py.typed beside {path}")
    return path.parent


def main() -> None:
    import actors
    import blackbird
    import projections
    from blackbird import BlackbirdSDK

    package_dir = check_installed(blackbird, "blackbird")
    check_installed(projections, "projections")
    actors_dir = check_installed(actors, "actors")
    check((actors_dir / "tiers.toml").is_file(), f"actors/tiers.toml missing from {actors_dir}")
    for sub in sorted(p for p in package_dir.iterdir() if (p / "__init__.py").is_file()):
        check((sub / "py.typed").is_file(), f"blackbird/{sub.name} has no py.typed")

    installed = importlib.metadata.version("blackbird-sdk")
    check(blackbird.__version__ != "0+unknown", "blackbird.__version__ is 0+unknown")
    check(
        blackbird.__version__ == installed,
        f"blackbird.__version__ {blackbird.__version__!r} != installed {installed!r}",
    )

    sdk = BlackbirdSDK(development_mode=True)
    try:
        sm = sdk.session_manager
        session = sm.create_session(user_id="smoke", tier="pro")
        sid = session.session_id
        check(session.is_active, f"new session {sid} is not active: {session.status}")

        check(sm.track_usage(sid, "smoke", "tokens", 10) is True, "track_usage did not return True")
        used = sm.get_quota(sid, "tokens")["used"]
        check(used == 10, f"tokens used {used!r} after tracking 10")

        text = "The smoke test remembers Porto."
        written = sdk.memory.remember(text, session_id=sid)
        hits = sdk.memory.recall("Where?", session_id=sid, k=1)
        check(len(hits) == 1, f"recall returned {len(hits)} memories, expected 1")
        check(
            hits[0].text == text and hits[0].memory_id == written.memory_id,
            f"recall returned {hits[0].text!r} ({hits[0].memory_id}), "
            f"expected {text!r} ({written.memory_id})",
        )

        sdk.memory.relate("Ada", "lives_in", "Paris", session_id=sid, subject_type="person")
        sdk.memory.relate("Ada", "lives_in", "Porto", session_id=sid, subject_type="person")  # ends Paris
        facts = sdk.memory.facts_about("ada", session_id=sid)
        check([f.object for f in facts] == ["Porto"], f"facts_about gave {[f.object for f in facts]}")
        history = sdk.memory.facts_about("Ada", session_id=sid, history=True)
        check(len(history) == 2, f"the graph's history holds {len(history)} facts, expected 2")
    finally:
        sdk.close()

    print(f"wheel smoke ok {blackbird.__version__}")


if __name__ == "__main__":
    main()
