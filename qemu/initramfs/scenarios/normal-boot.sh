#!/bin/sh
# The "Linux" entry of the resume menu: a normal boot got this far.
echo "ksave-test: normal boot reached userspace"
