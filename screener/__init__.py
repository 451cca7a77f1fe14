"""screener: PACS-connected opportunistic osteoporosis screening.

Research software: results are not for diagnostic use without review by a
qualified reader.
"""
__version__ = "0.1.0"
