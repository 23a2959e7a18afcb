#!/usr/bin/env bash
# Migrations are append-only. sqlx records a checksum of every migration it
# applied and refuses to start when a file it ran has since changed or gone,
# so editing or deleting a landed migration breaks every existing database.
#
# Fails, naming the file, when a migration was changed or deleted by any
# commit after the base (MIGRATIONS_BASE; default: where HEAD left
# origin/main, or HEAD~1 when HEAD is origin/main, as in a fresh clone), or
# by the uncommitted changes.
# A push of several commits cannot hide an edit in an earlier one. Add a new
# migration instead.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='crates/*/migrations/*'
if [ -n "${MIGRATIONS_BASE:-}" ]; then
    base="$MIGRATIONS_BASE"
elif git rev-parse --verify --quiet origin/main >/dev/null \
    && [ "$(git merge-base HEAD origin/main)" != "$(git rev-parse HEAD)" ]; then
    base="$(git merge-base HEAD origin/main)"
else
    # A fresh clone of what is being checked (CI): the last commit.
    base="HEAD~1"
fi
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
    echo "migrations: no base commit $base, skipped"
    exit 0
fi

bad=0
report() { # commit-or-label, status, file
    case "$2" in
        D) echo "error: migration $3 was deleted ($1); migrations are append-only" >&2 ;;
        R*) echo "error: migration $3 was renamed ($1); migrations are append-only" >&2 ;;
        *) echo "error: migration $3 was changed ($1); migrations are append-only: revert it and add a new migration" >&2 ;;
    esac
    bad=1
}

# Every commit after the base, against its own parent: only additions pass.
commits=0
while IFS= read -r commit; do
    commits=$((commits + 1))
    while IFS=$'\t' read -r status file _; do
        [ -n "$status" ] || continue
        [ "$status" = A ] || report "in commit $(git rev-parse --short "$commit")" "$status" "$file"
    done < <(git diff --name-status --no-renames "$commit~1" "$commit" -- "$pattern" 2>/dev/null || true)
done < <(git rev-list "$base..HEAD")

# And what is not committed yet.
while IFS=$'\t' read -r status file _; do
    [ -n "$status" ] || continue
    [ "$status" = A ] || report "not committed" "$status" "$file"
done < <(git diff --name-status --no-renames HEAD -- "$pattern")

if [ "$bad" = 1 ]; then
    exit 1
fi
echo "migrations: append-only in the $commits commit(s) since $(git rev-parse --short "$base") and the work tree"
