"""Tools every layer uses: locks, atomic writes, measurements, progress lines."""
