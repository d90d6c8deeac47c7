"""An NBIA-compatible HTTP server with generated DICOM archives and fault injection, and
an S3-compatible one for the same archive as IDC's public buckets hold it.

This subpackage never imports the client side of tciafs: it is judged against the
facts of the wire (docs/nbia-wire.md), not against the code that talks to it.

Its modules, callers first (imports run down this list, never up):

* ``cli``: the command line; ``launch``: starting it as a process and stopping it.
* ``server``: HTTP, routing, fault wiring, shaping and streaming; ``service``: what
  tells one server's protocol from another's.
* ``nbia`` and ``legacy``: the endpoints of the NBIA API and of the legacy Bindaas API.
* ``s3``: the S3 server of the IDC side; ``idccatalog``: its catalog as parquet;
  ``idc``: which series its buckets hold, under which keys.
* ``downloads``: series ZIPs and single images, with the faults that change content.
* ``queries``: filters, visibility, carts and date parameters over the archive.
* ``context``: what an endpoint sees of one request.
* ``faults``, ``auth``, ``wire``, ``zipstream``: fault plans and statistics, users and
  tokens, NBIA's reply formats, the streaming ZIP writer.
* ``archive``, ``profiles``, ``model``: the archives and their records.
* ``dicomgen``, with ``uids``, ``specs``, ``elements``, ``templates``, ``phantoms``: the
  generated DICOM files.
"""
