"""Launching a skill under the full local stack (`skillguard run`).

supervisor: plans, forks, supervises; child: the between-fork-and-exec
sequence and the namespace's init; mounts: the mount namespace; identity:
uid/gid allocation and the state dir; notify: seccomp user notifications.
"""
