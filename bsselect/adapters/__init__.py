"""Adapters from other frameworks' training setups to a ``bsselect.Task``."""
