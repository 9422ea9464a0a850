"""Media code both methods share: image/video files, in-memory conversions, atomic writes, illumination."""
