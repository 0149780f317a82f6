#!/bin/sh
# Reached only if Linux did not resume its image: a fresh boot.
echo "ksave-test: linux did not resume (fresh boot)"
exit 1
