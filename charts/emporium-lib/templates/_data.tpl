{{- define "emporium-lib.postgresdatabase" -}}
{{- if .Values.database.enabled -}}
apiVersion: emporium.dev/v1alpha1
kind: PostgresDatabase
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  serverRef:
    name: {{ include "emporium-lib.postgresServer" . }}
  databaseName: {{ .Values.database.name | default (include "emporium-lib.fullname" .) | replace "-" "_" }}
  reclaimPolicy: {{ .Values.database.reclaimPolicy }}
  secretName: {{ include "emporium-lib.dbSecretName" . }}
  {{- with .Values.database.extensions }}
  extensions:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/*
RabbitTopology: the service's topology file (files/rabbit-topology.yaml, the spec minus server, vhost and
secret) completed with the server, vhost and Secret name of this release.
*/}}
{{- define "emporium-lib.rabbittopology" -}}
{{- if .Values.rabbitmq.enabled -}}
{{- $file := .Files.Get .Values.rabbitmq.topologyFile -}}
{{- if not $file -}}
{{- fail (printf "rabbitmq.enabled needs the topology file %s in the chart" .Values.rabbitmq.topologyFile) -}}
{{- end -}}
{{- $topology := fromYaml $file -}}
{{- if hasKey $topology "Error" -}}
{{- fail (printf "%s: %s" .Values.rabbitmq.topologyFile $topology.Error) -}}
{{- end -}}
{{- $spec := omit $topology "serverRef" "vhost" "secretName" -}}
{{- $_ := set $spec "serverRef" (dict "name" (include "emporium-lib.rabbitServer" .)) -}}
{{- $_ := set $spec "vhost" (include "emporium-lib.rabbitVhost" .) -}}
{{- $_ := set $spec "secretName" (include "emporium-lib.amqpSecretName" .) -}}
{{- $_ := set $spec "reclaimPolicy" ($topology.reclaimPolicy | default .Values.rabbitmq.reclaimPolicy) -}}
{{- if .Values.rabbitmq.user -}}
{{- $_ := set $spec "user" (merge (dict "name" .Values.rabbitmq.user) ($spec.user | default dict)) -}}
{{- end -}}
apiVersion: emporium.dev/v1alpha1
kind: RabbitTopology
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  {{- toYaml $spec | nindent 2 }}
{{- end -}}
{{- end -}}

{{/*
Migration: one Job per release revision, as a Helm hook. post-install: the PostgresDatabase is created
with the release, so the Job starts after it; pre-upgrade: the schema moves before new pods roll out.
pre-upgrade only when the service is already running (its Deployment and database Secret exist): a service
enabled by this upgrade has neither yet (they come with the upgrade itself), so a pre-upgrade Job could never
start and the upgrade would wait for it until it times out; its migration runs post-upgrade instead.
The pod cannot start before the operator has written the database Secret (secretKeyRef), then an init
container waits until the server accepts connections; only this Job migrates (never the replicas at
startup), and `migrate` itself serialises concurrent runs, so several replicas are safe.
*/}}
{{- define "emporium-lib.migration" -}}
{{- if and .Values.database.enabled .Values.migration.enabled -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "emporium-lib.fullname" . }}-migrate
  labels:
    {{- include "emporium-lib.commonLabels" . | nindent 4 }}
    app.kubernetes.io/component: migration
  annotations:
    {{- $running := and .Release.IsUpgrade
          (lookup "apps/v1" "Deployment" .Release.Namespace (include "emporium-lib.fullname" .))
          (lookup "v1" "Secret" .Release.Namespace (include "emporium-lib.dbSecretName" .)) }}
    helm.sh/hook: {{ ternary "pre-upgrade" "post-install,post-upgrade" (not (empty $running)) }}
    helm.sh/hook-weight: "0"
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  parallelism: 1
  completions: 1
  # a retry starts only once the failed pod has fully terminated: never two migrations at once
  podReplacementPolicy: Failed
  backoffLimit: {{ .Values.migration.backoffLimit }}
  activeDeadlineSeconds: {{ .Values.migration.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ .Values.migration.ttlSecondsAfterFinished }}
  template:
    metadata:
      # not the service's selector labels: the Service and the PodDisruptionBudget must not select it
      labels:
        app.kubernetes.io/name: {{ include "emporium-lib.name" . }}-migrate
        app.kubernetes.io/instance: {{ .Release.Name }}
        app.kubernetes.io/component: migration
        app.kubernetes.io/part-of: emporium
      annotations:
        # the Job must finish: no sidecar that keeps the pod running
        sidecar.istio.io/inject: "false"
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "emporium-lib.serviceAccountName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      initContainers:
        - name: wait-for-database
          image: {{ include "emporium-lib.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            - python
            - -c
            - |
              import os, socket, sys, time
              host, port = os.environ["DB_HOST"], int(os.environ["DB_PORT"])
              for attempt in range(120):
                  try:
                      socket.create_connection((host, port), timeout=3).close()
                      sys.exit(0)
                  except OSError as exc:
                      print(f"waiting for {host}:{port}: {exc}", flush=True)
                      time.sleep(5)
              sys.exit(1)
          env:
            - name: DB_HOST
              valueFrom:
                secretKeyRef:
                  name: {{ include "emporium-lib.dbSecretName" . }}
                  key: host
            - name: DB_PORT
              valueFrom:
                secretKeyRef:
                  name: {{ include "emporium-lib.dbSecretName" . }}
                  key: port
          resources:
            {{- toYaml .Values.migration.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
      containers:
        - name: migrate
          image: {{ include "emporium-lib.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: ["python", "-m", {{ .Values.module | quote }}, "migrate"]
          env:
            {{- include "emporium-lib.env" . | nindent 12 }}
          resources:
            {{- toYaml .Values.migration.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with .Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- with .Values.extraVolumes }}
        {{- tpl (toYaml .) $ | nindent 8 }}
        {{- end }}
{{- end -}}
{{- end -}}

{{- define "emporium-lib.notes" -}}
{{ include "emporium-lib.fullname" . }} ({{ .Chart.Name }} {{ .Chart.Version }}) is installed in namespace {{ .Release.Namespace }}.

  Service:   http://{{ include "emporium-lib.fullname" . }}.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.service.port }}
{{- if .Values.database.enabled }}
  Database:  PostgresDatabase/{{ include "emporium-lib.fullname" . }} -> Secret {{ include "emporium-lib.dbSecretName" . }} (written by the operator)
  Migration: Job {{ include "emporium-lib.fullname" . }}-migrate runs `python -m {{ .Values.module }} migrate` once per release
{{- end }}
{{- if .Values.rabbitmq.enabled }}
  Broker:    RabbitTopology/{{ include "emporium-lib.fullname" . }} -> Secret {{ include "emporium-lib.amqpSecretName" . }} (written by the operator)
{{- end }}

Check it:
  kubectl -n {{ .Release.Namespace }} get postgresdatabases,rabbittopologies,deploy,pods -l app.kubernetes.io/instance={{ .Release.Name }}
  kubectl -n {{ .Release.Namespace }} port-forward svc/{{ include "emporium-lib.fullname" . }} 8000:{{ .Values.service.port }}
  curl -s localhost:8000/health
{{- end -}}
