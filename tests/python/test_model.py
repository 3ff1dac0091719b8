"""The model hearth serves is the one botocore and the AWS CLI ship (issue 9):
every operation of the repo's copy of Lambda MicroVMs 2025-09-09 is in
botocore's `lambda-microvms` model with the same HTTP binding and input shape
members, so boto3 and `aws lambda-microvms` work against hearth unmodified."""
import json

import botocore.loaders
import pytest

from conftest import MODEL, botocore_ships_the_model


KNOWN_NEWER_MEMBERS = {
    "CreateMicrovmImage": {"kmsKeyIdentifier"},
    "UpdateMicrovmImage": {"kmsKeyIdentifier"},
    "RunMicrovm": {"kmsKeyIdentifier"},
}


@pytest.mark.skipif(not botocore_ships_the_model(), reason="this botocore predates lambda-microvms")
def test_botocore_ships_the_same_operations():
    ours = json.loads(open(MODEL).read())
    theirs = botocore.loaders.Loader().load_service_model("lambda-microvms", "service-2")
    assert theirs["metadata"]["apiVersion"] == ours["metadata"]["apiVersion"] == "2025-09-09"
    assert len(ours["operations"]) == 24
    for name, op in ours["operations"].items():
        assert name in theirs["operations"], name
        other = theirs["operations"][name]
        assert other["http"]["method"] == op["http"]["method"], name
        assert other["http"]["requestUri"] == op["http"]["requestUri"], name
        if "input" in op:
            mine = ours["shapes"][op["input"]["shape"]]["members"].keys()
            shipped = theirs["shapes"][other["input"]["shape"]]["members"].keys()
            # botocore's copy is newer than the spec on one point: an optional
            # kmsKeyIdentifier on the three operations that store snapshots.
            # hearth's model is the spec's; any other difference fails here.
            assert set(mine) <= set(shipped), name
            assert set(shipped) - set(mine) <= KNOWN_NEWER_MEMBERS.get(name, set()), name
