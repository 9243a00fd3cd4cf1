"""The ratchet: which commit a candidate is, and the git moves that keep it or restore the champion.

    parent = hand_commit_base(ctx, campaign, receipts, head)   # HEAD's parent when HEAD is a hand commit
    created = candidate(ctx, campaign, draft, worktree, folded=parent is not None)
    final = keep(ctx, draft, created)              # the branch advances to the candidate
    restore(ctx, campaign, draft, champion)        # train.py back to the champion's

A branch has a campaign once it has a champion (a kept receipt). Before that, the working
tree as checked out is the baseline, whatever commits lie below it (main's history, a
campaign.toml commit): those were made before the campaign and are never judged. After it,
a single commit made by hand on top of the ledger is the candidate itself ("folded"): the
branch steps back to its parent until the commit is judged.
"""
from . import git_ops
from .context import shielded
from .format import LEDGER_COMMIT_PREFIX
from .ledger import champion


class Refusal(Exception):
    """The candidate cannot be judged as it stands; the message is the refusal's reason."""


def hand_commit_base(ctx, campaign, receipts, head: str) -> str | None:
    """The parent of HEAD when HEAD is a hand-made commit to judge, else None.

    Raises Refusal when HEAD is such a commit but cannot be judged (it touches files outside
    the mutable surface, or it sits on another unjudged commit).
    """
    c = campaign
    if champion(receipts, c.objective, c.sign, c.allow_smoke) is None:
        return None  # no campaign yet: everything below the working tree is the baseline's
    info = git_ops.commit_info(ctx.repo, head)
    judged = {r.get("commit") for r in receipts} | {r.get("parent") for r in receipts}
    if git_ops.is_ledger_message(info["message"]) or head in judged or not info["parents"]:
        return None
    recent = {x for r in receipts[-5:] for x in (r.get("commit"), r.get("parent")) if x}
    if any(git_ops.is_ancestor(ctx.repo, head, x) for x in recent):
        return None  # history the campaign already built on
    parent = info["parents"][0]
    outside = [p for p in git_ops.changed_paths(ctx.repo, parent, head) if p not in c.mutable]
    if outside:
        raise Refusal(f"HEAD ({head[:7]}) was committed by hand and changes files outside the mutable "
                      f"surface: {', '.join(outside)}. mlx-ar judges a hand commit only when it changes "
                      f"just {', '.join(c.mutable)}")
    pinfo = git_ops.commit_info(ctx.repo, parent)
    if not git_ops.is_ledger_message(pinfo["message"]) and parent not in judged:
        raise Refusal("more than one commit was made by hand on top of the last ledger commit; mlx-ar "
                      "judges one hand commit at a time")
    return parent


def candidate(ctx, campaign, d, worktree: dict, folded: bool) -> bool:
    """Make (or name) the candidate commit for `d` and keep it reachable; True when it is new.

    With `folded`, HEAD is the candidate and the branch steps back to `d.base` until judged.
    """
    head = git_ops.head_sha(ctx.repo)
    if folded:
        git_ops.move_branch(ctx.repo, ctx.branch, d.base, head, reason="mlx-ar: judge HEAD as an attempt")
        git_ops.sync_index(ctx.repo, campaign.mutable)
        d.cand, created = head, True
    elif worktree != d.base_files:
        d.cand = git_ops.make_commit(ctx.repo, parent=d.base, files=worktree, message=d.description)
        created = True
    else:
        d.cand, created = d.base, False
    git_ops.set_ref(ctx.repo, git_ops.attempt_ref(d.seq), d.cand)
    return created


def keep(ctx, d, created: bool) -> str:
    """Move the branch to the candidate (rebuilt on the tip when ledger commits landed meanwhile)."""
    if not created:
        return d.cand  # the candidate is the tip already (a baseline of HEAD)
    tip = git_ops.head_sha(ctx.repo)
    if tip == d.base:
        git_ops.move_branch(ctx.repo, ctx.branch, d.cand, tip, reason=f"keep {d.description[:40]}")
        final = d.cand
    else:  # ledger commits landed on this branch meanwhile (workers sharing the main checkout)
        final = git_ops.make_commit(ctx.repo, parent=tip, files=d.cand_files, message=d.description or "experiment")
        git_ops.move_branch(ctx.repo, ctx.branch, final, tip, reason=f"keep {d.description[:40]}")
    git_ops.sync_index(ctx.repo, list(d.cand_files))
    if git_ops.read_worktree(ctx.root, d.cand_files) != d.cand_files:
        d.notes.append("the mutable files were edited during the run; those edits are left uncommitted")
    return final


def restore(ctx, campaign, d, champ: dict | None) -> None:
    """Put the mutable surface back to the champion's (or the base's, before any champion)."""
    c = campaign
    target = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else d.base_files
    current = git_ops.read_worktree(ctx.root, c.mutable)
    if d.cand_files is not None and current != d.cand_files:
        d.notes.append("the mutable files were edited during the run; left as they are "
                       "(the candidate is in the receipt and under refs/mlx-ar/attempts)")
        return
    git_ops.write_worktree(ctx.root, target)
    tip = git_ops.head_sha(ctx.repo)
    if git_ops.read_commit(ctx.repo, tip, c.mutable) != target:
        # The champion is another worker's (or the branch drifted): adopt it explicitly.
        src = f"{champ['commit'][:7]} ({champ.get('branch')})" if champ else d.base[:7]
        git_ops.commit_on_branch(ctx.repo, branch=ctx.branch, files=target, write_files=False,
                                 message=f"{LEDGER_COMMIT_PREFIX} adopt champion {src}")
    else:
        git_ops.sync_index(ctx.repo, c.mutable)


def sync_to_champion(ctx, campaign) -> tuple[bool, str]:
    """Move a clean worktree's mutable surface to the global champion; (moved?, note)."""
    c = campaign
    with shielded() as pending, ctx.ledger.lock():
        champ = champion(ctx.ledger.receipts(), c.objective, c.sign, c.allow_smoke)
        head = git_ops.head_sha(ctx.repo)
        current = git_ops.read_worktree(ctx.root, c.mutable)
        target = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else None
        if champ is None:
            moved, note = False, "no champion yet"
        elif current != git_ops.read_commit(ctx.repo, head, c.mutable):
            moved, note = False, "edit in progress; left alone"
        elif target == current:
            moved, note = False, f"at the champion {champ['commit'][:7]}"
        else:
            git_ops.commit_on_branch(ctx.repo, branch=ctx.branch, files=target,
                                     message=f"{LEDGER_COMMIT_PREFIX} adopt champion {champ['commit'][:7]} "
                                             f"({champ.get('branch')})")
            moved, note = True, f"moved to the champion {champ['commit'][:7]}"
    if pending:
        raise KeyboardInterrupt
    return moved, note
