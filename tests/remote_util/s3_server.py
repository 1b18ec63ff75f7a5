"""An S3 server for sifuse's tests: moto in this process, with SigV4 checked.

Started by tests/remote_util (S3Server). It listens on 127.0.0.1 at an ephemeral port,
creates an IAM user whose access key may use S3 (and a role to assume, for session
credentials), then turns moto's authentication on, so every later request must carry a
valid SigV4 signature. It prints one JSON line (port and credentials) and then serves
commands read line by line from stdin, each answered by one line on stdout:

    put BUCKET KEY PATH     store the file at PATH as s3://BUCKET/KEY (the bucket is made)
    etag BUCKET KEY         print the object's ETag

It stops when stdin closes (the test's handle dropped) or on SIGTERM.
"""

import json
import logging
import sys

import boto3
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

ADMIN = dict(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")


def main():
    logging.disable(logging.CRITICAL)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    iam = boto3.client("iam", endpoint_url=endpoint, **ADMIN)
    iam.create_user(UserName="sifuse-test")
    allow_s3 = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:*", "sts:*"], "Resource": "*"}],
        }
    )
    iam.put_user_policy(UserName="sifuse-test", PolicyName="s3", PolicyDocument=allow_s3)
    key = iam.create_access_key(UserName="sifuse-test")["AccessKey"]
    trust = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
        }
    )
    role = iam.create_role(RoleName="sifuse-reader", AssumeRolePolicyDocument=trust)["Role"]
    iam.put_role_policy(RoleName="sifuse-reader", PolicyName="s3", PolicyDocument=allow_s3)
    sts = boto3.client("sts", endpoint_url=endpoint, **ADMIN)
    session = sts.assume_role(RoleArn=role["Arn"], RoleSessionName="sifuse")["Credentials"]

    # From here on every request must be signed by a known key.
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0

    user = dict(
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
        region_name="us-east-1",
    )
    s3 = boto3.client("s3", endpoint_url=endpoint, **user)
    print(
        json.dumps(
            {
                "port": port,
                "access_key_id": key["AccessKeyId"],
                "secret_access_key": key["SecretAccessKey"],
                "session_access_key_id": session["AccessKeyId"],
                "session_secret_access_key": session["SecretAccessKey"],
                "session_token": session["SessionToken"],
            }
        ),
        flush=True,
    )

    buckets = set()
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "put" and len(words) == 4:
                bucket, key_name, path = words[1:]
                if bucket not in buckets:
                    try:
                        s3.create_bucket(Bucket=bucket)
                    except s3.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    buckets.add(bucket)
                with open(path, "rb") as f:
                    etag = s3.put_object(Bucket=bucket, Key=key_name, Body=f)["ETag"]
                print("ok " + etag, flush=True)
            elif words[0] == "etag" and len(words) == 3:
                etag = s3.head_object(Bucket=words[1], Key=words[2])["ETag"]
                print("ok " + etag, flush=True)
            else:
                print("error unknown command: " + line.strip(), flush=True)
        except Exception as e:  # report to the test, keep serving
            print("error " + str(e).replace("\n", " "), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
