"""Side-by-side speed of boldjax train steps against PyTorch re-implementations (issue #6).

torch is imported only here, never by boldjax/ itself.
"""
