"""An NBIA-compatible HTTP server with generated DICOM archives and fault injection.

This subpackage never imports the client side of tciafs: it is judged against the
wire reference, not against the code that talks to it.
"""
