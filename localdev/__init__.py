"""Local development aids, not shipped in the wheel: S3/SFTP test servers, the demo, the data
generator. Needs the repository checkout and the `demo` (or `dev`) extra."""
