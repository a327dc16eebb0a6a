"""Constants shared by the op and the suppression state (no imports: importing the package stays
quick)."""

MODES = ("paper", "log")
