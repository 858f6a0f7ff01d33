"""Provider tests: the conformance suite is a helper module, so have pytest rewrite its asserts."""

import pytest

pytest.register_assert_rewrite("tests.providers.conformance")
