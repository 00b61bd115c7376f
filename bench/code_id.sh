#!/bin/bash
# Prints what code a benchmark runs: the checkout's commit and the hash of its working
# tree as git would commit it (tracked and untracked files; what .gitignore and
# .git/info/exclude leave out is left out). Where a machine gets a copy of the working
# tree with stale git metadata, the tree hash still names the content: find its commit
# with `git log --format='%h %T' | grep TREE`.
cd "$(dirname "$0")/.." || exit 1
index=$(mktemp -u)
# (the folders that device calls carry, ignored here, are left out too: the device copy
# lacks .git/info/exclude)
tree=$(GIT_INDEX_FILE=$index git add -A . 2>/dev/null &&
  GIT_INDEX_FILE=$index git rm -r -q --cached --ignore-unmatch .whl .old .orig shared &&
  GIT_INDEX_FILE=$index git write-tree 2>/dev/null)
rm -f "$index"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), tree ${tree:-unknown}"
