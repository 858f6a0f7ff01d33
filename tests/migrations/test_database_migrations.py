"""The Alembic migrations of the database provider: they build exactly the model's tables,
keep their own version table, drop everything on ``downgrade base``, and run from a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import sqlalchemy_eventbroker
from sqlalchemy_eventbroker.providers.database import DatabaseProvider, downgrade, upgrade
from sqlalchemy_eventbroker.providers.database import _schema as _db_schema

TABLES = {"events", "events_groups", "events_claims"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each kind."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(db_url)
    yield e
    e.dispose()


def _diff(engine: sa.Engine, table_name: str = "events") -> list[object]:
    tables = _db_schema.build_tables(table_name, engine.dialect.name)
    names = set(tables.metadata.tables)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": lambda name, kind, parent: kind != "table" or name in names,
        })
        return list(compare_metadata(ctx, tables.metadata))


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_head__schema_equals_the_model(engine: sa.Engine, db_url: str) -> None:
    """After ``upgrade head`` Alembic's autogenerate comparison finds no difference."""
    upgrade(db_url)
    assert TABLES <= _tables(engine)
    assert _diff(engine) == []


def test_upgrade_head__uses_its_own_version_table(engine: sa.Engine, db_url: str) -> None:
    """The revision is recorded in ``eventbroker_alembic_version``, never ``alembic_version``."""
    upgrade(db_url)
    assert "alembic_version" not in _tables(engine)
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM eventbroker_alembic_version"))
        assert version.scalar_one() == _db_schema.HEAD_REVISION


def test_downgrade_base__drops_the_tables(engine: sa.Engine, db_url: str) -> None:
    """``downgrade base`` removes every table the migrations created."""
    upgrade(db_url)
    downgrade(db_url)
    assert not (TABLES & _tables(engine))


def test_comparison__detects_a_drifted_model(engine: sa.Engine, db_url: str) -> None:
    """The comparison is not vacuous: a model with an extra index shows a difference."""
    upgrade(db_url)
    tables = _db_schema.build_tables("events", engine.dialect.name)
    sa.Index("ix_events_extra", tables.events.c.user_id)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "include_name": lambda n, k, p: k != "table" or n in tables.metadata.tables})
        assert compare_metadata(ctx, tables.metadata)


def test_table_name__own_tables_and_version_table(engine: sa.Engine, db_url: str) -> None:
    """A second events table migrates independently, next to the default one."""
    upgrade(db_url)
    upgrade(db_url, table_name="audit")
    assert {"audit", "audit_groups", "audit_claims",
            "eventbroker_alembic_version_audit"} <= _tables(engine)
    assert _diff(engine, "audit") == []
    downgrade(db_url, table_name="audit")
    assert "audit" not in _tables(engine) and "events" in _tables(engine)


def test_create_schema__stamped_so_upgrade_is_a_no_op(engine: sa.Engine, db_url: str) -> None:
    """``create_schema()`` then ``upgrade head``: nothing is created twice, no difference."""
    with DatabaseProvider(db_url) as p:
        p.create_schema()
    upgrade(db_url)
    assert _diff(engine) == []


def test_head_revision__constant_matches_the_scripts() -> None:
    """``HEAD_REVISION`` (stamped by ``create_schema``) is the scripts' head."""
    script = ScriptDirectory.from_config(_db_schema.alembic_config("sqlite://"))
    assert script.get_current_head() == _db_schema.HEAD_REVISION


def test_migrate_module__one_liner_creates_the_tables(engine: sa.Engine, db_url: str) -> None:
    """``python -m sqlalchemy_eventbroker.migrate upgrade --url URL`` migrates that database."""
    run = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_eventbroker.migrate", "upgrade", "--url", db_url],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert TABLES <= _tables(engine)
    with DatabaseProvider(db_url) as p:  # and the provider is happy with it
        p.store(sqlalchemy_eventbroker.new_event("database", "public.t.create"))


def test_migrate_module__bad_url_exits_non_zero_with_a_message() -> None:
    """A database that cannot be reached: exit status 1 and a one-line error, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_eventbroker.migrate", "upgrade",
         "--url", "postgresql+psycopg://postgres@127.0.0.1:1/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode == 1 and run.stderr.startswith("error:")
    assert "Traceback" not in run.stderr


def test_wheel_layout__migrations_found_inside_the_package(tmp_path: Path, sqlite_url: str) -> None:
    """Laid out as the wheel installs it (``sqlalchemy_eventbroker/migrations``), it migrates."""
    src = Path(sqlalchemy_eventbroker.__file__).parent
    site = tmp_path / "site"
    shutil.copytree(src, site / "sqlalchemy_eventbroker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src.parent / "migrations", site / "sqlalchemy_eventbroker" / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sqlalchemy_eventbroker, sys\n"
        "from sqlalchemy_eventbroker.providers.database._schema import migrations_path, upgrade\n"
        "print(sqlalchemy_eventbroker.__file__); print(migrations_path())\n"
        "upgrade(sys.argv[1])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, sqlite_url], capture_output=True, text=True, timeout=60,
        check=False,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert run.returncode == 0, run.stderr
    package_file, migrations = run.stdout.split()
    assert package_file.startswith(str(site)) and migrations.startswith(str(site))
    e = sa.create_engine(sqlite_url)
    try:
        assert TABLES <= _tables(e)
    finally:
        e.dispose()


def test_origin__0001_rows_stay_readable_after_upgrade_and_downgrade(engine: sa.Engine,
                                                                   db_url: str) -> None:
    """A row written under 0001 reads back after 0002 (origin NULL) and after downgrading
    to 0001 again; the ``origin`` column comes and goes."""
    upgrade(db_url, "0001_events")
    t = sa.table("events", *(sa.column(c) for c in (
        "id", "source", "type", "status", "retry_count", "error", "session_id",
        "instance_id", "schema", "entity", "operation", "created_at", "metadata")))
    e = sqlalchemy_eventbroker.new_event("database", "public.t.create")
    with engine.begin() as conn:
        conn.execute(t.insert().values(
            id=e.id, source="database", type=e.type, status="pending", retry_count=0, error="",
            session_id="", instance_id="", schema="", entity="", operation="",
            created_at=e.created_at, metadata="{}"))
    upgrade(db_url)
    assert "origin" in {c["name"] for c in sa.inspect(engine).get_columns("events")}
    with DatabaseProvider(db_url) as p:
        got = p.get(e.id)
        assert got is not None and got.type == e.type
        p.store(sqlalchemy_eventbroker.new_event("database", "public.t.update"))
    downgrade(db_url, "0001_events")
    assert "origin" not in {c["name"] for c in sa.inspect(engine).get_columns("events")}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 2


def test_drop_schema__mixed_case_table_leaves_other_version_tables_alone(db_url: str,
                                                                       engine: sa.Engine) -> None:
    """Identifiers are quoted: dropping a mixed-case table's schema drops exactly its tables
    and its own version table, and leaves the default table's version table alone."""
    with DatabaseProvider(db_url) as default, DatabaseProvider(db_url, table_name="AuditEvents") as mixed:
        default.create_schema()
        mixed.create_schema()
        names = _tables(engine)
        assert {"AuditEvents", "eventbroker_alembic_version_AuditEvents",
                "eventbroker_alembic_version"} <= names
        mixed.drop_schema()
        names = _tables(engine)
        assert not {"AuditEvents", "AuditEvents_groups", "AuditEvents_claims",
                    "eventbroker_alembic_version_AuditEvents"} & names
        assert TABLES | {"eventbroker_alembic_version"} <= names


def test_key__0002_rows_read_back_with_an_empty_key_after_upgrade_and_downgrade(
        engine: sa.Engine, db_url: str) -> None:
    """A row written under 0002 reads back with ``key == ""`` after 0003; a keyed event
    round-trips; downgrading to 0002 drops the column and keeps the rows."""
    upgrade(db_url, "0002_origin")
    # This version's provider writes ``key``: write the 0002 row by hand.
    t = sa.table("events", *(sa.column(c) for c in (
        "id", "source", "type", "status", "retry_count", "error", "session_id",
        "instance_id", "schema", "entity", "operation", "created_at", "metadata")))
    old = sqlalchemy_eventbroker.new_event("database", "public.t.create")
    with engine.begin() as conn:
        conn.execute(t.insert().values(
            id=old.id, source="database", type=old.type, status="pending", retry_count=0,
            error="", session_id="", instance_id="", schema="", entity="", operation="",
            created_at=old.created_at, metadata="{}"))
    upgrade(db_url)
    assert "key" in {c["name"] for c in sa.inspect(engine).get_columns("events")}
    keyed = sqlalchemy_eventbroker.new_event("database", "public.t.update", key="public.t:1")
    with DatabaseProvider(db_url) as p:
        got = p.get(old.id)
        assert got is not None and got.key == ""
        p.store(keyed)
        assert p.get(keyed.id).key == "public.t:1"  # type: ignore[union-attr]
    downgrade(db_url, "0002_origin")
    assert "key" not in {c["name"] for c in sa.inspect(engine).get_columns("events")}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 2


def _venv(path: Path) -> tuple[Path, Path]:
    """A fresh virtual environment: its python and its site-packages."""
    import sysconfig
    import venv

    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    purelib = sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    return python, Path(purelib)


def _ours(site: Path) -> list[str]:
    return sorted(p.name for p in site.iterdir() if "sqlalchemy_eventbroker" in p.name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel__install_migrate_uninstall_leaves_nothing(tmp_path: Path, sqlite_url: str) -> None:
    """The built wheel holds the migrations inside the package; installed in a fresh venv it
    finds them there and migrates; ``pip uninstall`` then leaves nothing behind, so
    ``import sqlalchemy_eventbroker`` fails again (issue 11, row 18)."""
    import sysconfig
    import zipfile

    root = Path(__file__).resolve().parents[2]
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                    str(root)], check=True, timeout=300, capture_output=True)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sqlalchemy_eventbroker/migrations/env.py" in names
    assert any(n.startswith("sqlalchemy_eventbroker/migrations/versions/0001") for n in names)
    python, site = _venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300, capture_output=True)
    # Dependencies from this interpreter's site-packages, after the venv's own.
    deps = sysconfig.get_path("purelib")
    code = ("import sys; sys.path.append(sys.argv[2])\n"
            "from sqlalchemy_eventbroker.providers.database._schema import migrations_path, "
            "upgrade\nprint(migrations_path()); upgrade(sys.argv[1])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-c", code, sqlite_url, deps], capture_output=True,
                         text=True, timeout=120, check=False, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(site / "sqlalchemy_eventbroker" / "migrations")
    subprocess.run([*pip, "uninstall", "-y", "sqlalchemy-eventbroker"], check=True, timeout=120,
                   capture_output=True)
    assert _ours(site) == []
    gone = subprocess.run([str(python), "-c", "import sqlalchemy_eventbroker"], cwd=tmp_path,
                          env=env, capture_output=True, timeout=60, check=False)
    assert gone.returncode != 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_editable__nothing_copied_into_site_packages(tmp_path: Path) -> None:
    """An editable install puts only its .pth file and metadata in site-packages (no
    ``sqlalchemy_eventbroker/migrations`` copy), finds the checkout's migrations, and its
    uninstall leaves nothing (issue 11, row 18)."""
    root = Path(__file__).resolve().parents[2]
    python, site = _venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "-e", str(root)], check=True, timeout=300,
                   capture_output=True)
    assert not (site / "sqlalchemy_eventbroker").exists()
    import sysconfig

    code = ("import sys; sys.path.append(sys.argv[1])\n"
            "from sqlalchemy_eventbroker.providers.database._schema import migrations_path\n"
            "print(migrations_path())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-c", code, sysconfig.get_path("purelib")],
                         capture_output=True, text=True, timeout=120, check=False,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(root / "migrations")
    subprocess.run([*pip, "uninstall", "-y", "sqlalchemy-eventbroker"], check=True, timeout=120,
                   capture_output=True)
    assert _ours(site) == []
