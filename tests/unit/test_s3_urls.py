"""S3 URLs: what ``parse_s3_url`` accepts and refuses (no server, no boto3 needed).

The transfers themselves, against moto's S3 server: tests/integration/test_s3.py.
"""

from __future__ import annotations

import pytest

from thaw_agents_core.store.s3 import parse_s3_url


@pytest.mark.parametrize(
    "url", ["http://b/k", "s3://", "s3://bucket", "s3://bucket/", "s3:///key", "s3://b/dir/"]
)
def test_bad_urls(url):
    with pytest.raises(ValueError, match="bad S3 URL"):
        parse_s3_url(url)
    assert parse_s3_url("s3://b/some/key.thawkv") == ("b", "some/key.thawkv")
