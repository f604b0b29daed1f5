"""The control plane of an update run: plain functions that tasks, admin actions
and management commands all call, one module per question.

The database rows are the truth about a run. The Celery chains built here only
carry the work: every node step reports back (reports.record_step), and every
change of a run's or a step's state is a conditional UPDATE in lifecycle, so a
duplicate message changes nothing.

    lifecycle        which state a run or step may move to, and from which
    start            may an update start; starting runs
    chains           which steps a chain carries; queuing it at commit
    reports          what a node reports about a step
    snapshots        what a node's agent says about the node
    download_policy  a scheduled run's failed download
    cluster_cap      a cluster's update slots: taking one, waiting in line, handing it on
    verify           is the node back after install and reboot
    end              a run's end: complete or failed
    locks            update locks
    recovery         carrying on after lost messages; the stall reaper
"""
