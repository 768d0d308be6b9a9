"""Produces a backlog for the merge benchmark (bench/merge-backlog): N transactions, then N
navigation events (one 50 ms before each purchase, same customer and session), keyed by
customer with Kafka's murmur2 partitioner, into new topics `<run>-tx` and `<run>-nav`
(4 partitions) plus the scorer's other topics.

    python bench/backlog_producer.py RUN N
"""
import sys, json
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
run=sys.argv[1]
a=AdminClient({'bootstrap.servers':'127.0.0.1:9092'})
fs=a.create_topics([NewTopic(f"{run}-{t}", 4 if t in ('tx','nav') else 1, 1) for t in ('tx','nav','verdicts','dlq','labels','blocklist')])
[f.result() for f in fs.values()]
p=Producer({'bootstrap.servers':'127.0.0.1:9092','partitioner':'murmur2_random','linger.ms':5})
T0=1795341600000
n=int(sys.argv[2])
for kind in ('tx','nav'):
    for i in range(n):
        c=f"c{i%2000}"; s=f"s{i//20000}"; t=T0+i*100
        if kind=='nav':
            p.produce(f"{run}-nav", key=c, value=json.dumps({"event_id":f"n{i}","event_time":t-50,"customer_id":c,"session_id":s,"kind":"page_view","device_id":"d"}))
        else:
            p.produce(f"{run}-tx", key=c, value=json.dumps({"transaction_id":f"e{i}","event_time":t,"customer_id":c,"merchant_id":"m","amount":10.0,"currency":"EUR","session_id":s,"features":[0.0]*30}))
        if i%10000==0: p.flush()
p.flush()
