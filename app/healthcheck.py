"""python -m app.healthcheck: exits 0 when the server on this host answers GET /ready with 200,
else 1. For container HEALTHCHECKs: the image needs no curl. The port is QUILL_PORT (default 8000)."""

import os
import sys
import urllib.error
import urllib.request


def main():
    url = f"http://127.0.0.1:{os.environ.get('QUILL_PORT', '8000')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # raises on 503 (loading or draining)
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"not ready: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
