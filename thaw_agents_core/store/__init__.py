"""Where snapshots live: the index and store interface (``base``), a folder of files (``file``),
a shared-memory arena for one host (``shm``), S3 transfers (``s3``), and URLs (``url``:
``open_store("shm://name")``, ``"file:///dir"``)."""
