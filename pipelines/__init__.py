"""The AutoThink pipeline DAG and its run back ends (see DESIGN.md)."""
