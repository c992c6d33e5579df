"""The commands over an OUTPUT or a machine: status, report, evaluate, export, bench and the demo."""
