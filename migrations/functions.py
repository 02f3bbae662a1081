"""What revisions that change a function's signature share: replace it without losing who
may execute it, and read an earlier revision's definition instead of copying it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op


def replace_function(
    s: str, old: str | None, new: str, create: str, *, grants_from: str | None = None
) -> None:
    """Drop function ``old`` (if any), run ``create`` (function ``new``), and grant EXECUTE
    on ``new`` to every role that could execute ``grants_from`` (default: ``old``).

    One DO block: the grantees live in a variable, not a temporary table, which would need
    the TEMPORARY privilege and leave temporary schemas behind in the catalogue.
    """
    source = grants_from or old
    assert source is not None, "a new function needs grants_from"
    drop_old = f'DROP FUNCTION IF EXISTS "{s}".{old};' if old else ""
    op.execute(
        sa.text(
            f"""
DO $migrate$
DECLARE
    grantees text[];
BEGIN
    SELECT coalesce(array_agg(a.grantee::regrole::text), '{{}}') INTO grantees
    FROM pg_proc AS p, aclexplode(p.proacl) AS a
    WHERE p.oid = to_regprocedure('"{s}".{source}')
      AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    {drop_old}
    -- A database migrated from a development snapshot may already have the other form.
    DROP FUNCTION IF EXISTS "{s}".{new};
    EXECUTE $create${create}$create$;
    REVOKE ALL ON FUNCTION "{s}".{new} FROM PUBLIC;
    FOR i IN 1 .. cardinality(grantees) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION "{s}".{new} TO %s', grantees[i]);
    END LOOP;
END
$migrate$"""
        )
    )


def earlier_definition(s: str, revision_file: str, function: str) -> str:
    """The CREATE FUNCTION statement of ``function`` as revision ``revision_file`` made it."""
    path = Path(__file__).with_name("versions") / revision_file
    spec = importlib.util.spec_from_file_location(f"pgqueue_revision_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    statements: list[str] = revision._functions(s)
    return next(sql for sql in statements if f'FUNCTION "{s}".{function}(' in sql)
