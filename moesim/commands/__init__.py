"""Subcommands of ``moesim``: one module each, exposing ``register(subparsers)``.

A module's ``register`` adds its parser and sets ``func`` (``args -> int``). Keep heavy imports
(torch, matplotlib) inside the handler so ``moesim --help`` stays fast.
"""
