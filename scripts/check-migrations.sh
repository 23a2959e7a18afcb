#!/usr/bin/env bash
# Migrations are append-only. sqlx records a checksum of every migration it
# applied and refuses to start when a file it ran has since changed or gone,
# so editing or deleting a landed migration breaks every existing database.
#
# Fails, naming the file, when a migration that exists in the base
# (MIGRATIONS_BASE; default: where HEAD left origin/main, or HEAD~1 when HEAD
# is origin/main, as in a fresh clone) was changed or deleted since, by any
# commit or by the uncommitted changes: several commits cannot hide an edit
# in an earlier one. Add a new migration instead.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='crates/*/migrations/*'
if [ -n "${MIGRATIONS_BASE:-}" ]; then
    base="$MIGRATIONS_BASE"
elif merge_base="$(git merge-base HEAD origin/main 2>/dev/null)" \
    && [ "$merge_base" != "$(git rev-parse HEAD)" ]; then
    base="$merge_base"
else
    # A fresh clone of what is being checked (CI): the last commit.
    base="HEAD~1"
fi
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
    echo "migrations: no base commit $base, skipped"
    exit 0
fi

bad=0
checked=0
# The net change from the base to the work tree: a migration that the base
# has must still be there, unchanged. (One added after the base may still be
# edited before it lands.)
while IFS=$'\t' read -r status file _; do
    [ -n "$status" ] || continue
    checked=$((checked + 1))
    case "$status" in
        A) ;;
        D)
            echo "error: migration $file (in $(git rev-parse --short "$base")) was deleted; migrations are append-only" >&2
            bad=1
            ;;
        *)
            echo "error: migration $file (in $(git rev-parse --short "$base")) was changed; migrations are append-only: revert it and add a new migration" >&2
            git --no-pager diff --stat "$base" -- "$file" >&2 || true
            bad=1
            ;;
    esac
done < <(git diff --name-status --no-renames "$base" -- "$pattern")

if [ "$bad" = 1 ]; then
    exit 1
fi
echo "migrations: append-only since $(git rev-parse --short "$base") ($checked new)"
