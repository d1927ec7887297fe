"""Pipeline integration cases in the style of Gadgetron's ``test/integration/cases``.

Each ``cases/<name>.cfg`` names a simulated raw-data recipe (``[dataset]``), a pipeline from ``pipelines/``
(``[reconstruction] configuration``, sent by name as CONFIG_FILE), optional ``[distributed] nodes`` (worker
servers), and a reference (``[test]``).  A case passes when, per image series, ‖out − ref‖/‖ref‖ and
|Σout/Σref − 1| are under the thresholds.  Regenerate the references after an intended change with
``python -m tests.integration --regenerate`` (``make references``).
"""
