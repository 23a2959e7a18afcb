#!/usr/bin/env bash
# Migrations are append-only. sqlx records a checksum of every migration it
# applied and refuses to start when a file it ran has since changed or gone,
# so editing or deleting a landed migration breaks every existing database.
# Fails, naming the file, when a migration that exists in the base commit
# (default HEAD~1, or MIGRATIONS_BASE) differs in, or is missing from, the
# working tree. Add a new migration instead.
set -euo pipefail
cd "$(dirname "$0")/.."

base="${MIGRATIONS_BASE:-HEAD~1}"
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
    echo "migrations: no base commit $base, skipped"
    exit 0
fi

bad=0
checked=0
while IFS= read -r file; do
    checked=$((checked + 1))
    if [ ! -e "$file" ]; then
        echo "error: migration $file (in $base) was deleted; migrations are append-only" >&2
        bad=1
    elif [ "$(git rev-parse "$base:$file")" != "$(git hash-object "$file")" ]; then
        echo "error: migration $file was changed since $base; migrations are append-only: revert it and add a new migration" >&2
        git --no-pager diff --stat "$base" -- "$file" >&2 || true
        bad=1
    fi
done < <(git ls-tree -r --name-only "$base" -- crates | grep '/migrations/' || true)

if [ "$bad" = 1 ]; then
    exit 1
fi
echo "migrations: $checked files of $base unchanged (append-only)"
