"""Running one unit of work elsewhere than this process: AWS Lambda through plain boto3.
(ECS runs go through Prefect's work pools, in ``tasks/``.)
"""
