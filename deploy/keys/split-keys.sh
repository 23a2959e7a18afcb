#!/bin/sh
# Development keys for deploy/compose.yaml, made once by the one-shot `keys`
# service: `agora keygen` writes every pair into /keys (a volume only this
# container mounts), then each service's volume /out/<service> receives the
# public keys of all and the private key of that service alone; only users
# also gets the user-token signing key. So no container can read another
# one's private key. In production the keys come from Kubernetes Secrets
# (deploy/k8s/README.md).
set -eu
agora keygen --dir /keys
for service in users catalog inventory payments orders notifications; do
    out="/out/$service"
    mkdir -p "$out/services"
    cp /keys/jwt_ed25519.pub.pem "$out/"
    cp /keys/services/*.pub.pem "$out/services/"
    cp -p "/keys/services/$service.pem" "$out/services/"
done
cp -p /keys/jwt_ed25519.pem /out/users/
# The gateway verifies user tokens only: the user-token public key, no
# private key at all.
cp /keys/jwt_ed25519.pub.pem /out/gateway/
# The services run as the image's `agora` user (uid 10001); private keys
# keep keygen's owner-only mode (cp -p).
chown -R 10001:10001 /out
